"""Pages of the dashboard, each a script run by ``st.navigation`` in ``moesim/app/main.py``."""
