"""qlocal studio: a local web UI over the working folders (outputs/, export/, data/, models/).

Stack: FastAPI + uvicorn + Jinja2, server-rendered pages, one small script (static/studio.js),
charts from plotly's own JS bundle served out of the installed `plotly` package, live updates by
server-sent events. Nothing here is imported by `qlocal --help`: cli.py imports
`qlocal.studio.server` inside the `studio` command.

Modules
  app.py      create_app(root, token) -> FastAPI: state, security middleware, templates, routers
  security.py token check on every request, same-origin check on POST, Host check, `confine()`
  jobs.py     JobRunner: qlocal's own subcommands in the background (argv list, never a shell),
              their log, status, SIGINT stop; records kept under <root>/.qlocal-studio/jobs/
  runs.py     run folders -> status/summary/metrics (no web code, testable alone)
  pages.py    Runs table, Run page, metrics JSON + SSE, run comparison
  newrun.py   New-run form, validated by qlocal.config (the CLI's code), Stop and Resume
  server.py   run_studio(): uvicorn on host:port, token rules for non-loopback hosts

  exports.py  Export page: quants for a finished run, `qlocal export` as a job, verify table
  chat.py     Chat page: streamed answers from a run or an export, base model side by side

Adding a page
  A module `qlocal.studio.<name>` defines `router: fastapi.APIRouter`, and create_app includes
  it beside pages, newrun, exports and chat. Its routes:
    * get shared state from `request.app.state.studio` (a `Studio`: .root, .token, .jobs
      (JobRunner), .templates (Jinja2Templates over qlocal/studio/templates/), .runs_dir,
      .export_dir, .data_dir), never by importing qlocal.studio.app (that would be a cycle);
    * render templates that `{% extends "base.html" %}` and fill `{% block content %}`
      (and optionally `{% block head %}`); base.html's nav links /runs, /new, /export, /chat,
      and marks the current one from the template variable `nav` ("runs"|"new"|"export"|"chat");
    * turn every path that came from the browser into a Path with
      `security.confine(studio.root, value)` (raises PathRefused -> 403) before using it;
    * start processes only through `studio.jobs.start([...qlocal subcommand args...], run=...)`;
      the runner refuses anything but qlocal's own allowed subcommands.
  The middleware already enforces the token and the same-origin rule for every route added.
  A page's own JS goes in static/<name>.js (served at /static/<name>.js); plotly is at
  /static/plotly.min.js.
"""
