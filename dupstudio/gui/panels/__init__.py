"""One widget per tab of the main window. Panels talk to the project (the document) and submit
worker jobs through the main window's JobRunner; they never touch MLX themselves."""
