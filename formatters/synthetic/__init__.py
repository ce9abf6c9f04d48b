"""Writers of small synthetic datasets in the real source formats, for tests and the demo."""
