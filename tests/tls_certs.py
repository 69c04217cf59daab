"""The test PKI (scripts/make_test_pki.py, on sys.path through conftest): make_pki(folder) -> TestPki."""
from make_test_pki import CertFactory, Pair, TestPki, make_pki  # noqa: F401
