#!/bin/sh
# Starts the daemon; on first start it imports the default model into the models volume.
set -e
exec ollama-compact serve "$@"
