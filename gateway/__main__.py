from gateway.cli import app

# vLLM spawns engine processes that re-import the main module: keep the guard.
if __name__ == "__main__":
    app()
