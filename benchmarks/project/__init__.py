"""The project-shaped Django project bench_project.py serves: startproject's settings, one app."""
