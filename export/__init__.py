"""edgemm exporters (the top-level export/ folder, installed as edgemm.export)."""
