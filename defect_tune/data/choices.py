"""The choices `prepare` takes, named once: its readers' formats and the ways an image reaches its
stored size. Plain names only, so the command line lists them in --help without importing the
readers or an image library."""

FORMATS = ("voc", "severstal", "folders", "csv", "elpv", "synthetic")
FITS = ("pad", "keep", "tile", "squash")
