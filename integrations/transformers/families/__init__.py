"""One adapter per model family; importing a module registers its adapter."""
