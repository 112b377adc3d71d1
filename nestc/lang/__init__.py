"""The front end: source text to a checked IR (syntax, AST, schema, semantic analysis, diagnostics,
the formatter and the error index). Nothing here imports torch."""
