# Sourced by scripts/run and scripts/test: make .venv with the project installed (editable) and its
# test extras, reinstalling only when pyproject.toml changed. Sets PY.
venv=.venv
stamp=$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e ".[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
PY=$venv/bin/python
