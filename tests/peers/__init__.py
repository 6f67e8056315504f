"""Peers' suites: asgiref's, Django's and Channels' own tests, run with the bridge in place.

``scripts/peer_suites.sh`` (``make peers``) downloads the sdists of the
installed asgiref and Django and runs their suites through the hooks here:
``asgiref_plugin`` (a pytest plugin) and ``django_runner`` (a Django test
runner, selected by ``django_settings``); Channels' tests, which its sdist
leaves out, come from ``channels-<version>-tests.tar.gz`` (its release tag's
``tests/``) and run through ``channels_plugin``. ``expected_failures.txt`` lists the
failures that remain, with the reason; ``expectations`` reads it.
"""
