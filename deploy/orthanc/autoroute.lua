-- Orthanc auto-routing: forward every instance Orthanc stores to dicom-sorter's listener.
-- 'sorter' is the DicomModalities entry of orthanc.json (AE SORTER, host, port 11112).
-- Unlike Orthanc's Autorouting.lua sample, nothing is deleted: Orthanc keeps its copy.

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Instances Orthanc creates itself from Lua (modify, anonymize) are not forwarded twice.
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return
  end
  -- Synchronous C-STORE: an error (listener down, spool below its free-space floor) is logged by
  -- Orthanc and the instance is not retried; re-send later with POST /modalities/sorter/store.
  SendToModality(instanceId, 'sorter')
end
