"""The DICOM node of xray-serve: receive (node), decide, build the SR / heatmap SC (sr), keep them on disk
(outbox) and deliver them (sender, over a transport: dimse_client for C-STORE, stow_client for DICOMweb STOW-RS;
destination parses --send-to, credentials reads --send-credentials); its command-line options (options)."""
