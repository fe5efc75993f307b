"""Small helpers every layer of the package may use: atomic files, configuration loading, devices."""
