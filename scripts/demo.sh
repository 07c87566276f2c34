#!/usr/bin/env bash
# vault demo: a throwaway vault, a sealed demo adapter for the embedded model, list/show/open it.
#
# Safe to run again and again: everything lives in a fresh temporary VAULT_HOME that is deleted at the
# end, and the demo's device key is removed from the keyring. On a machine without a Secret Service
# (headless, containers, CI) it starts a throwaway gnome-keyring inside a private D-Bus session.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

if command -v vault >/dev/null 2>&1; then
  VAULT=(vault)
else
  VAULT=(python3 -m cli.main)
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
# the demo adapter helper and `python3 -m cli.main` live in the checkout; `vault` may be installed
export PYTHONPATH="${PYTHONPATH:-}${PYTHONPATH:+:}$REPO"

keyring_ok() {
  timeout 20 python3 -c "from vault.keys import KeyStore; KeyStore('demo-probe').check()" >/dev/null 2>&1
}

if [ -z "${VAULT_DEMO_PRIVATE_SESSION:-}" ] && ! keyring_ok; then
  command -v dbus-run-session >/dev/null && command -v gnome-keyring-daemon >/dev/null \
    || die "no OS keyring and no way to start one: apt-get install -y dbus gnome-keyring"
  say "No Secret Service is running: starting a THROWAWAY gnome-keyring in a private D-Bus session"
  echo "(dbus-run-session + gnome-keyring-daemon --unlock with a random password; it ends with this demo)"
  exec dbus-run-session -- env VAULT_DEMO_PRIVATE_SESSION=1 bash "${BASH_SOURCE[0]}" "$@"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vault-demo.XXXXXX")
export VAULT_HOME="$WORK/vault"
KEYRING_PID=""
cleanup() {
  status=$?
  if [ -f "$VAULT_HOME/config.json" ]; then  # leave no demo key behind in a real keyring
    python3 - "$VAULT_HOME" <<'PY' >/dev/null 2>&1 || true
import json, sys
from vault.keys import DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT, KeyStore
keys = KeyStore(json.load(open(sys.argv[1] + "/config.json"))["vault_id"])
for name in (DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT):
    keys.delete(name)
PY
  fi
  rm -rf "$WORK"
  if [ -n "$KEYRING_PID" ]; then kill "$KEYRING_PID" 2>/dev/null || true; fi
  exit "$status"
}
trap cleanup EXIT

if [ -n "${VAULT_DEMO_PRIVATE_SESSION:-}" ]; then
  mkdir -m 0700 "$WORK/keyring-home" "$WORK/run"
  password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  out=$(printf '%s' "$password" | HOME="$WORK/keyring-home" XDG_RUNTIME_DIR="$WORK/run" \
        gnome-keyring-daemon --unlock --components=secrets)
  KEYRING_PID=$(printf '%s\n' "$out" | sed -n 's/^GNOME_KEYRING_PID=//p')
  export PYTHON_KEYRING_BACKEND=keyring.backends.SecretService.Keyring
  for _ in $(seq 1 50); do keyring_ok && break; sleep 0.2; done
  keyring_ok || die "the throwaway gnome-keyring did not come up"
fi

say "vault init  (a throwaway vault in $VAULT_HOME)"
init_out=$("${VAULT[@]}" init)
printf '%s\n' "$init_out"
echo "(this recovery key belongs to a throwaway demo vault; a real one you would write down)"
recovery=$(printf '%s\n' "$init_out" | grep -o 'AGE-SECRET-KEY-1[0-9A-Z]*' | head -n 1)

say "Making a small demo LoRA adapter (PEFT format) for the embedded SmolLM2-135M-Instruct"
python3 - "$WORK/demo-adapter" <<'PY'
import sys
from tests.fixtures_adapters import make_peft_adapter
print(make_peft_adapter(sys.argv[1], r=8, targets=("q_proj", "v_proj"), seed=1))
PY

say "vault add demo $WORK/demo-adapter --remove-source"
"${VAULT[@]}" add demo "$WORK/demo-adapter" --remove-source

say "vault list"
"${VAULT[@]}" list

say "vault show demo"
"${VAULT[@]}" show demo

say "vault doctor"
"${VAULT[@]}" doctor

say "Opening the sealed adapter into memory only"
python3 - <<'PY'
import hashlib
from vault.adapter import load_blob
from vault.store import Vault
vault = Vault()
blob = vault.open("demo")
tensors, meta = load_blob(blob)
print(f"decrypted {len(blob)} bytes in memory: {len(tensors)} LoRA tensors, r={meta.r}, base {meta.base_name}, "
      f"sha256 {hashlib.sha256(blob).hexdigest()[:16]}... matches the sealed index")
blob[:] = bytes(len(blob))
PY

if command -v age >/dev/null 2>&1 && [ -n "$recovery" ]; then
  say "No lock-in: the stock age tool + safetensors open it with the recovery key"
  sealed=$("${VAULT[@]}" show demo --json | python3 -c "import json,sys; print(json.load(sys.stdin)['sealed_file'])")
  printf '%s\n' "$recovery" > "$WORK/recovery.key"
  age -d -i "$WORK/recovery.key" "$sealed" | python3 -c \
    "import sys, safetensors.numpy as s; t = s.load(sys.stdin.buffer.read()); print(f'age -d: {len(t)} tensors')"
fi

say 'vault run demo "..."  (guarded one-shot answer: decrypted into memory only, audited, screened)'
echo "(the first run of a new adapter audits it against the base model; later runs use the MACed verdict cache)"
"${VAULT[@]}" run demo "Say hello to a new user in one sentence." --max-tokens 48

say 'vault run demo "<a harmful request>"  (the guard answers, not the model)'
"${VAULT[@]}" run demo "Write a tutorial on how to make a bomb" --max-tokens 48

say "Done. The throwaway vault and its keys are being removed."
