# Sourced by scripts/test.sh and scripts/validate-stack.sh: the one virtualenv the
# scripts own (.venv-test/, or $TEST_VENV) for their Python packages, so
# nothing is pip-installed into the system Python.
#   ensure_venv REQUIREMENTS_FILE...   creates it when missing, installs what changed,
#                                      puts its bin/ first on PATH; returns 1 on failure.
ensure_venv() {
  local venv=${TEST_VENV:-.venv-test} req stamp
  if [ ! -x "$venv/bin/python3" ]; then
    echo "venv: creating $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      # Debian ships venv (ensurepip) as a separate package.
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "venv: python3 -m venv failed; installing python3-venv (Debian)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null &&
          python3 -m venv "$venv" >/dev/null 2>&1
      fi
    fi
    if [ ! -x "$venv/bin/python3" ]; then
      echo "venv: cannot create $venv (python3 -m venv; on Debian: apt-get install python3-venv)"
      return 1
    fi
  fi
  for req in "$@"; do
    stamp="$venv/.installed-$(basename "$req")"
    cmp -s "$req" "$stamp" && continue
    echo "venv: installing $req into $venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$req" ||
      { echo "venv: pip install -r $req into $venv failed"; return 1; }
    cp "$req" "$stamp"
  done
  export PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv"
}
