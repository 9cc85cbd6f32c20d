# megatron-nitp on an NGC PyTorch image: CUDA, cuDNN, NCCL, Transformer Engine, Apex and
# Python 3.12 come with the base; this adds megatron-core (the 0.19 line, Python >= 3.12), the
# project's light dependencies and the project itself, without touching the image's torch.
#
#   docker build -t megatron-nitp .
#   docker build -t megatron-nitp --build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g) .
#   docker run --gpus all --rm megatron-nitp                  # tools/check_env.py
#   docker run --gpus all --rm --ipc=host -v /data:/data megatron-nitp \
#       bash examples/pretrain.sh dense-0.5b                  # see docs/cluster.md
#
# BASE_IMAGE is pinned (NGC release 25.12: Ubuntu 24.04, Python 3.12, CUDA 13.0); another NGC
# PyTorch release with Python >= 3.12 works the same way (check its driver requirement).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ARG MCORE_VERSION=0.19.2
# USER_UID 0 (default): run as root, as NGC images do. Another UID: create the user USER_NAME
# with USER_UID/USER_GID, give it the project folder and the corpus cache, and run as it.
ARG USER_UID=0
ARG USER_GID=0
ARG USER_NAME=nitp

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# MEGATRON_NITP_CACHE holds the built-in corpus, prepared below into the image. It lives inside
# each node's container, so it is no place for anything the ranks share: megatron-core builds
# the dataset index cache on global rank 0 only and the other ranks read it, so a multi-node
# job needs --data-cache-path on a file system all nodes see (the examples pass
# $RUN_DIR/data-cache; a multi-node start without --data-cache-path is refused).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    MEGATRON_NITP_CACHE=/opt/megatron-nitp/cache
WORKDIR /workspace/megatron-nitp

# Dependencies first (a layer that survives source edits): pyproject.toml's, except torch and
# megatron-core. The image's torch is pinned by a constraints file written from the installed
# version, so no resolution can replace it; megatron-core is installed with --no-deps (its only
# heavy dependency is torch, which the image brings), and so is the project below.
COPY pyproject.toml /tmp/megatron-nitp/pyproject.toml
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && python -c "import re, tomllib; deps = tomllib.load(open('/tmp/megatron-nitp/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.match(r'[\w.-]+', d).group(0).lower() not in ('torch', 'megatron-core')))" > /tmp/requirements.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt --requirement /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps "megatron-core==${MCORE_VERSION}" \
    && python -c "import torch, sys; want = open('/tmp/torch-constraint.txt').read().split('==')[1].strip(); sys.exit(torch.__version__ != want)"

COPY . /workspace/megatron-nitp
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /workspace/megatron-nitp \
    && python -c "import megatron_nitp; from megatron.core import package_info; print('megatron-core', package_info.__version__)" \
    && python -c "from megatron_nitp.data.corpus import prepare_default_corpus; prepare_default_corpus()" \
    && chmod -R a+rwX /opt/megatron-nitp/cache \
    && if [ "${USER_UID}" != 0 ]; then \
        groupadd --non-unique --gid "${USER_GID}" "${USER_NAME}" \
        && useradd --non-unique --create-home --uid "${USER_UID}" --gid "${USER_GID}" "${USER_NAME}" \
        && chown -R "${USER_UID}:${USER_GID}" /workspace/megatron-nitp /opt/megatron-nitp; \
    fi

USER ${USER_UID}:${USER_GID}
CMD ["python", "tools/check_env.py"]
