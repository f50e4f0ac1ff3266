"""dds.selector"""
