# Sourced by every pip step of the Dockerfile (bind-mounted, never in an image): trust the CA bundle of the
# optional "ca" build secret (TLS-inspecting proxies), and install only from the build context's
# wheelhouse/ when it holds wheels (offline builds).
if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca
fi
if [ -n "$(ls -A /wheelhouse 2>/dev/null)" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse
fi
