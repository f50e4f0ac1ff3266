"""dds.pipeline"""
