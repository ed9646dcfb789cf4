# SDK worker image for Flink/Spark/Dataflow clusters (environment DOCKER): Beam's Python 2.77 SDK harness,
# CPU-only torch/torchvision, and this package with its dependencies. Build and pass it to the runner:
#   docker build -t REGISTRY/spade-beam-worker:0.1.0 .
#   docker push REGISTRY/spade-beam-worker:0.1.0
#   spade --runner-profile configs/runners/flink.yaml score ... --sdk_container_image REGISTRY/spade-beam-worker:0.1.0
# The launcher needs the same Python minor version (3.11) and Beam version as this image.
FROM apache/beam_python3.11_sdk:2.77.0

# CPU wheels first, so that installing the package below does not pull the CUDA builds of torch.
RUN pip install --no-cache-dir "torch>=2.2,<=2.14.1" "torchvision>=0.17,<=0.29.1" \
        --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/spade
COPY setup.py README.md ./
COPY spade ./spade
COPY transforms ./transforms
COPY pipelines ./pipelines
COPY configs ./configs
# gcsfs / s3fs let fsspec reach the shared storage that galleries and outputs live on.
RUN pip install --no-cache-dir . gcsfs s3fs

# Beam's SDK harness entry point stays the image's entry point (inherited from the base image).
