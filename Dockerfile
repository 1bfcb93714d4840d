# The image the Helm chart (deploy/helm/tandem) and deploy/k8s run: `tandem:0.1.0`.
# Every Ray node of the RayService (head and worker groups) runs it; KubeRay starts
# `ray start ...` in it through bash, and Ray Serve imports cluster.app:build_app from it.
# So it holds Ray at the chart's rayVersion (2.60.0) and tandem with its serve extra.
#
#   docker build -t tandem:0.1.0 .
#   # GPU pools (values-gpu-pd.yaml uses tag 0.1.0-cuda): a CUDA build of torch.
#   docker build -t tandem:0.1.0-cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                --build-arg EXTRAS=serve,kernels .
#
# Without Kubernetes: docker run --rm -p 8000:8000 --shm-size=2g tandem:0.1.0
# serves the embedded default model on CPU (then try /v1/models and /dashboard).
FROM python:3.11-slim

# torch goes in first from the PyTorch index of the wanted build (CPU by default); an
# unpinned torch from PyPI would pull the CUDA wheels into a CPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_VERSION=2.60.0
ARG EXTRAS=serve

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# bash: KubeRay runs the container's command with `/bin/bash -lc`. wget and curl: what
# KubeRay's own (exec) probes and init containers call when a chart does not set probes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates curl wget \
 && rm -rf /var/lib/apt/lists/*

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The project: only what the package needs (.dockerignore lets nothing else in).
WORKDIR /opt/tandem
COPY . ./
RUN pip install ".[${EXTRAS}]" "ray[serve]==${RAY_VERSION}" \
 && cd / && python -c "import ray, cluster.app, cluster.dashboard; assert ray.__version__ == '${RAY_VERSION}'"

# Ray's images run as user `ray` (uid 1000, home /home/ray); so does this one.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER 1000
WORKDIR /home/ray
# The embedded default model is written here on first use; write it now, so pods start
# without that step (deterministic random weights, about 25 MB).
ENV TANDEM_CACHE=/home/ray/.cache/tandem
RUN python -c "from engine.default_model import default_model_path; print(default_model_path())"

# 8000 Serve (OpenAI API, /dashboard), 8265 Ray dashboard, 6379 GCS, 10001 Ray client,
# 8080 metrics export, 52365 dashboard agent (probes): the ports the chart names.
EXPOSE 8000 8265 6379 10001 8080 52365
CMD ["tandem", "serve", "--host", "0.0.0.0"]
