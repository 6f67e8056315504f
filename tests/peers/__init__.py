"""Peers' suites: asgiref's and Django's own tests, run with the bridge in place.

``scripts/peer_suites.sh`` (``make peers``) downloads the sdists of the
installed asgiref and Django and runs their suites through the hooks here:
``asgiref_plugin`` (a pytest plugin) and ``django_runner`` (a Django test
runner, selected by ``django_settings``). ``expected_failures.txt`` lists the
failures that remain, with the reason; ``expectations`` reads it.
"""
