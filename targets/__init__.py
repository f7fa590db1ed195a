"""adasr targets: one data file per device and the small loader that validates them."""
