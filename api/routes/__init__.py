"""Controllers, one module per resource. Each handler translates HTTP to one
engine or store call and the outcome back to HTTP; no business rule lives here."""
