"""Prompt Processing (LDM-230 2.1): every visit, detector by detector, within a minute."""
