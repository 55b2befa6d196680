"""kerasdet.heads"""
