"""The DICOM node of xray-serve: receive (node), decide, build the SR / heatmap SC (sr), keep them on disk
(outbox) and deliver them (sender); its command-line options (options)."""
