"""Front-ends: turn a user's model into a torch module whose layers are real submodules."""
