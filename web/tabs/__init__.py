"""The page, one module per tab: each lays out its tab and wires its events over the server's objects (web.lab_app)."""
