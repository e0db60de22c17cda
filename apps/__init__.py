"""The Streamlit feature browser (installed as saekit.apps)."""
