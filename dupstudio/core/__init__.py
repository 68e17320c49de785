"""Pure computation over MLX / numpy / pandas. Never imports Qt or dupstudio.gui."""
