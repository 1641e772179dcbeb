"""edgemm runtime adapters (the top-level runtimes/ folder, installed as edgemm.runtimes)."""
