"""kerasdet.zoo"""
