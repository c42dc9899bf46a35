"""The daemon's web dashboard: a static page (uPlot charts) and the run's metrics history it polls."""
