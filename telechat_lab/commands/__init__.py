"""Files Python can run as scripts, for the launchers that start a command again (DDP on one machine starts
`python sys.argv[0] ...` for each rank). Named so that nothing in this directory shadows a module of their
imports."""
