"""`python -m par_agent_host`: run the agent described by $PAR_AGENT_SPEC."""

from .host import main

raise SystemExit(main())
