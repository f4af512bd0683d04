"""The moesim Streamlit dashboard (``moesim app``): thin pages over the library.

``main.py`` is the entry script (``st.navigation``); pages live in ``app_pages/``; ``state``
holds the session's traces and caches; ``charts`` builds the Plotly figures.
"""
