"""`distml ui`: runs, models, services, queues and watches in a browser, over the same workspace.

`app` (routes, auth, event streams), `pages` (what each page shows, from the owners' reads, and
what its actions call), `svg` (the DAG, lineage graphs and charts drawn on the server), with
`templates/` (Jinja2) and `static/` (one stylesheet and a small script of our own) as package data.
"""
