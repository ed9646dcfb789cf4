#!/usr/bin/env bash
# Usage: fetch_jobservers.sh DEST [flink|spark]...  -> DEST/beam-<engine>-job-server-2.62.0.jar (thin jar, Class-Path -> DEST/<engine>-lib/*.jar)
#
# Beam's Flink and Spark job servers for the Python SDK's FlinkRunner/SparkRunner (--flink_job_server_jar,
# --spark_job_server_jar). Maven Central, as reached here, serves no beam-runners-*-job-server jar (2.77.0 and
# older all 404), but it serves the runner libraries; 2.62.0 is the newest Beam whose Flink 1.19 and Spark 3 runners
# and java-job-service are all there. So: `mvn dependency:copy-dependencies` fetches a runner and its libraries
# (once: ~/.m2 caches them), and a tiny launcher jar names the driver class and lists every library by absolute
# path, so that `java -jar` starts the job server. A jar already in DEST is kept (re-runs only check).
set -euo pipefail
DEST=$(realpath -m "$1"); shift; BV=2.62.0; mkdir -p "$DEST"
[ $# -eq 0 ] && set -- flink spark
for eng in "$@"; do
  case $eng in
    flink) deps="org.apache.beam:beam-runners-flink-1.19:$BV"; main=org.apache.beam.runners.flink.FlinkJobServerDriver;;
    spark) deps="org.apache.beam:beam-runners-spark-3:$BV org.apache.spark:spark-core_2.12:3.5.0 org.apache.spark:spark-streaming_2.12:3.5.0 org.apache.spark:spark-sql_2.12:3.5.0"; main=org.apache.beam.runners.spark.SparkJobServerDriver;;
  esac
  jar="$DEST/beam-$eng-job-server-$BV.jar"; [ -f "$jar" ] && continue
  w=$(mktemp -d); { echo '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion><groupId>x</groupId><artifactId>x</artifactId><version>1</version><packaging>pom</packaging><dependencies>'
    for d in $deps; do IFS=: read g a v <<<"$d"; echo "<dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"; done
    echo '</dependencies></project>'; } > "$w/pom.xml"
  mvn -B -q -f "$w/pom.xml" ${MVN_ARGS:-} dependency:copy-dependencies -DoutputDirectory="$DEST/$eng-lib"
  python3 - "$jar" "$main" "$DEST/$eng-lib" <<'PY'
import sys, os, zipfile, pathlib
out, main, lib = sys.argv[1:]
cp = ' '.join(pathlib.Path(lib, j).as_uri() for j in sorted(os.listdir(lib)) if j.endswith('.jar'))
def wrap(s):
    b = s.encode(); parts = [b[:72]]; b = b[72:]
    while b: parts.append(b' ' + b[:71]); b = b[71:]
    return b'\r\n'.join(parts) + b'\r\n'
mf = b''.join(wrap(f'{k}: {v}') for k, v in [('Manifest-Version', '1.0'), ('Main-Class', main), ('Class-Path', cp)]) + b'\r\n'
with zipfile.ZipFile(out + '.tmp', 'w') as z: z.writestr('META-INF/MANIFEST.MF', mf)
os.replace(out + '.tmp', out)
PY
  rm -rf "$w"; echo "built $jar"
done
