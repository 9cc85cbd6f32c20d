#!/usr/bin/env bash
# Sourced by the scripts that test against other packages (test_019.sh, test_lm_eval.sh):
#   layered_venv VENV
# creates VENV (if missing) layered on the main environment .venv (made by scripts/setup.sh if
# missing): a .pth file adds .venv's site-packages, with its own .pth files (this project's
# editable install), after VENV's own. VENV then holds only what differs (megatron-core 0.19.2;
# lm-eval and its dependencies), and pip sees torch and the rest as installed: no second copy of
# torch is unpacked (most of the minutes a fresh environment took in CI).
layered_venv() {
  local venv=$1 site main_site
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$main_site')" >"$site/nitp-main-venv.pth"
}
