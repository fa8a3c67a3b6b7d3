"""ldf: the data facility of a survey telescope (Rubin LDM-230's services)."""

__version__ = "0.1.0"
