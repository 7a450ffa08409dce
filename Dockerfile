# The member launcher (workers/executors/launcher.c) is built here: the slim image has no C compiler, and
# without the launcher a local worker starts members through sh and setpriv (about 1 ms of CPU more each).
FROM python:3.11-slim AS launcher
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY workers/executors/launcher.c /tmp/launcher.c
RUN gcc -O2 -static -o /jobservice-launch /tmp/launcher.c

FROM python:3.11-slim
WORKDIR /srv
COPY --from=launcher /jobservice-launch /usr/local/bin/jobservice-launch
COPY . .
RUN pip install --no-cache-dir .
ENV PORT=8000
ENV WORKER_LAUNCHER=/usr/local/bin/jobservice-launch
