"""One module per diffusers family; each registers its Backbone subclass (stas.backbones.registry imports them all)."""
