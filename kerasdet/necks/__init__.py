"""kerasdet.necks"""
