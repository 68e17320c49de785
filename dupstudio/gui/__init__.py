"""Qt front end. Talks to dupstudio.core only through functions taking progress + cancel."""
