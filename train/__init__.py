"""dds.train"""
