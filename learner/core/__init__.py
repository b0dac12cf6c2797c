"""The inference core: what both the server and the learner import.

The network (`model`), its typed configuration (`config`), evaluation transforms
(`augment`, `evaluate`), the version payload (`versioning`), image decoding (`images`),
devices and machine records (`machine`), the method catalogue (`methods`) and the schema of
per-job overrides (`overrides`). Nothing here trains: no optimiser, loss, exemplar selection,
data-set loader or benchmark, so an API worker that imports only this package stays small.
"""
