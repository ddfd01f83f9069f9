"""SANDBOX ONLY: the monitoring stack's images, built from Debian packages like images.py's.

Production's configs/monitoring/docker-compose.monitoring.yml pins upstream images
(prom/prometheus, prom/node-exporter, ...) that no registry here can serve. Debian
trixie packages the same programs at the same upstream versions, so one mmdebstrap
tree holds them all and each tag below starts one of them; the sandbox override
(configs/monitoring/compose.sandbox.yml) swaps the production images for these tags.
Each entrypoint is the Debian binary, so the production file's `command:` flags apply
unchanged, and each runs as the user the production file names.

Grafana is not packaged by Debian: `coachntt-sandbox/grafana-standin` runs
fabfile/sandbox/grafana_standin.py, a password-protected page on Grafana's port that
reads the same generated admin password. It is not Grafana.

The family is apart from images.FAMILIES so hosts that only run the app never build
or load it: `images.load_images(host, families=MONITORING_FAMILIES)`.
"""

from __future__ import annotations

from pathlib import Path

from .images import ImageConfig, ImageFamily

STANDIN_SOURCE = Path(__file__).with_name("grafana_standin.py")
TAG = "trixie"

MONITORING = ImageFamily(
    name="monitoring",
    packages=(
        "prometheus",  # 2.53.3 in trixie (with promtool)
        "prometheus-node-exporter",  # 1.9.0
        "prometheus-postgres-exporter",  # 0.17.1
        "prometheus-nginx-exporter",  # 1.4.1
        "python3",  # the Grafana stand-in
    ),
    files=((STANDIN_SOURCE, "/usr/local/bin/grafana-standin", 0o755),),
    customize=(
        # Prometheus' data directory, owned by the user it runs as (as in prom/prometheus)
        'mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"',
        # Grafana's data directory, owned by Grafana's uid 472 (as in grafana/grafana)
        'mkdir -p "$1/var/lib/grafana" && chown 472:0 "$1/var/lib/grafana"',
    ),
    images=(
        ImageConfig(
            tag=f"coachntt-sandbox/prometheus:{TAG}",
            user="nobody",
            entrypoint=("/usr/bin/prometheus",),
            cmd=("--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"),
            workdir="/prometheus",
            expose=("9090/tcp",),
            volumes=("/prometheus",),
        ),
        ImageConfig(tag=f"coachntt-sandbox/node-exporter:{TAG}", user="nobody",
                    entrypoint=("/usr/bin/prometheus-node-exporter",), expose=("9100/tcp",)),
        ImageConfig(tag=f"coachntt-sandbox/postgres-exporter:{TAG}", user="nobody",
                    entrypoint=("/usr/bin/prometheus-postgres-exporter",), expose=("9187/tcp",)),
        ImageConfig(tag=f"coachntt-sandbox/nginx-exporter:{TAG}", user="nobody",
                    entrypoint=("/usr/bin/prometheus-nginx-exporter",), expose=("9113/tcp",)),
        ImageConfig(
            tag=f"coachntt-sandbox/grafana-standin:{TAG}",
            user="472",
            entrypoint=("python3", "/usr/local/bin/grafana-standin"),
            env=("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"),
            workdir="/var/lib/grafana",
            expose=("3000/tcp",),
        ),
    ),
)

MONITORING_FAMILIES = (MONITORING,)
