# The member launcher (workers/executors/launcher.c) is built here: the slim image has no C compiler, and
# without the launcher a local worker starts members through sh and setpriv (about 1 ms of CPU more each).
FROM python:3.11-slim AS launcher
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY workers/executors/launcher.c workers/executors/launcher.py /tmp/build/
# Built as a worker builds it (launcher.build: without the C library where it can, else static), with its trial run.
RUN cd /tmp/build && python -c "import launcher, pathlib, sys; sys.exit(launcher.build(pathlib.Path('/jobservice-launch')) is None)"

FROM python:3.11-slim
WORKDIR /srv
COPY --from=launcher /jobservice-launch /usr/local/bin/jobservice-launch
COPY . .
RUN pip install --no-cache-dir .
ENV PORT=8000
ENV WORKER_LAUNCHER=/usr/local/bin/jobservice-launch
