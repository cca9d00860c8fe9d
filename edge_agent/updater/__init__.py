"""Over-the-air model updates on the device: TUF-verified releases, A/B slots, self-test, health window.

Modules, one job each: :mod:`.release_info` (the signed custom fields), :mod:`.compat` (can this
device run it), :mod:`.tufclient` and :mod:`.fetcher` (python-tuf ngclient, resumable downloads),
:mod:`.archive` (the package tar), :mod:`.state` (persistent state and its transitions, pure),
:mod:`.store` (files), :mod:`.boot` (which model to start with), :mod:`.health` (the health window,
pure) and :mod:`.updater` (the thread that ties them together). See docs/updates.md.
"""
